"""What Aidbox's router reads from a FHIR-style path: route parameters and the operation.

Aidbox's request object merges the query with the parameters its router extracts from the URL
(`params.resource/type`, `params.resource/id`) and names the operation (`operation.id`:
`FhirRead`, `FhirSearch`, ...). Policies written for Aidbox depend on both, so the context builds
them the same way. The grammar (docs/policies.md has it with examples):

    [/Organization/<org id>]  [/fhir]  /<Type>[/<id>[/_history[/<vid>]]]   (or /<Type>/_history)
                                       /<Type>[/<id>]/$<operation>
                                       /<Type>/<id>/<CompartmentType>
                                       /$<operation>    /                   (system level)
    POST /rpc                                                                   (Aidbox's RPC: `rpc`)

Names: `/fhir/...` routes are FHIR operations (`FhirRead`); the same route without `/fhir` is
Aidbox's own API (`Read`), as Aidbox names them. A route-parameter name is reserved: a query
parameter of that name never reaches `params`, whether or not this path yields it, so a client
can never supply `resource/type` or `resource/id` itself.

A path is read as a FHIR server reads it: a trailing slash and repeated slashes do not count
(`/fhir/Patient/` is the search, `/fhir/Patient//pt-1/` the read; Envoy's `merge_slashes`
gives the upstream the same path). A route shape with a method it does not take
(`POST /fhir/Patient/pt-1`) is no route at all: no params, no operation.

A FHIR-shaped path (its first segment, after `[/Organization/<id>]/fhir`, a resource type or a
`$operation`) that is no route must never satisfy a policy written for a route: Aidbox's router
would never route it, and a policy that constrains `params` only when they are there (a
json-schema `properties` without `required`) would let it through. `unrouted` tells the Authorizer,
which refuses such a request before any policy is asked (400 `ambiguous_path`): the router reads
no route where a policy would read an instance. So is a `;` in such a path, because a servlet
upstream strips `;x=1` from `/fhir/Patient/pt-2;x=1` and serves pt-2. docs/policies.md has the rule.

Also here: FHIR references in Aidbox's format (`parse_reference`), which matcho's `$reference`
and the Role and User resources use.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

RESOURCE_TYPE = "resource/type"
RESOURCE_ID = "resource/id"
RESOURCE_VERSION = "resource/version"
ORGANIZATION_ID = "organization/id"
OPERATION_NAME = "operation/name"
ROUTE_PARAMS = frozenset({RESOURCE_TYPE, RESOURCE_ID, RESOURCE_VERSION, ORGANIZATION_ID, OPERATION_NAME})

_TYPE_PATTERN = r"[A-Z][A-Za-z0-9]{0,63}"
_ID_PATTERN = r"(?!\.+(?:/|$))[A-Za-z0-9\-.]{1,64}"  # FHIR's id, but never `.` or `..` (as a segment)
_TYPE = re.compile(_TYPE_PATTERN)

# The resource types a path at the root names when it is FHIR (Aidbox serves `/<Type>/...` beside
# `/fhir/<Type>/...`): FHIR R4 and R5's, and Aidbox's own. Only `unrouted` reads it, to tell an
# Aidbox path from a generic upstream's capitalized one.
RESOURCE_TYPES = frozenset(
    """
    Account ActivityDefinition ActorDefinition AdministrableProductDefinition AdverseEvent
    AllergyIntolerance Appointment AppointmentResponse ArtifactAssessment AuditEvent Basic Binary
    BiologicallyDerivedProduct BiologicallyDerivedProductDispense BodyStructure Bundle
    CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Citation Claim
    ClaimResponse ClinicalImpression ClinicalUseDefinition CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Condition ConditionDefinition
    Consent Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue
    Device DeviceAssociation DeviceDefinition DeviceDispense DeviceMetric DeviceRequest DeviceUsage
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter EncounterHistory Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare
    EventDefinition Evidence EvidenceReport EvidenceVariable ExampleScenario ExplanationOfBenefit
    FamilyMemberHistory Flag FormularyItem GenomicStudy Goal GraphDefinition Group GuidanceResponse
    HealthcareService ImagingSelection ImagingStudy Immunization ImmunizationEvaluation
    ImmunizationRecommendation ImplementationGuide Ingredient InsurancePlan InventoryItem
    InventoryReport Invoice Library Linkage List Location ManufacturedItemDefinition Measure
    MeasureReport Media Medication MedicationAdministration MedicationDispense MedicationKnowledge
    MedicationRequest MedicationStatement MedicinalProduct MedicinalProductAuthorization
    MedicinalProductContraindication MedicinalProductDefinition MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionIntake NutritionOrder
    NutritionProduct Observation ObservationDefinition OperationDefinition OperationOutcome
    Organization OrganizationAffiliation PackagedProductDefinition Parameters Patient PaymentNotice
    PaymentReconciliation Permission Person PlanDefinition Practitioner PractitionerRole Procedure
    Provenance Questionnaire QuestionnaireResponse RegulatedAuthorization RelatedPerson RequestGroup
    RequestOrchestration Requirements ResearchDefinition ResearchElementDefinition ResearchStudy
    ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot
    Specimen SpecimenDefinition StructureDefinition StructureMap Subscription SubscriptionStatus
    SubscriptionTopic Substance SubstanceDefinition SubstanceNucleicAcid SubstancePolymer
    SubstanceProtein SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification
    SupplyDelivery SupplyRequest Task TerminologyCapabilities TestPlan TestReport TestScript Transport
    ValueSet VerificationResult VisionPrescription
    AccessPolicy App Attribute AuthConfig Client Entity Grant IdentityProvider Notification
    Operation Role SearchQuery Session TokenIntrospector User
    """.split()  # noqa: SIM905 (a block of names reads better than 190 quoted strings)
)
_ID = re.compile(_ID_PATTERN)
_OPERATION = re.compile(r"\$[A-Za-z][A-Za-z0-9\-_.]{0,63}")

# (segments shape, method) -> interaction, for the shapes that are not type-level searches.
_INSTANCE = {"get": "Read", "head": "Read", "put": "Update", "patch": "Patch", "delete": "Delete"}
_TYPE_LEVEL = {"get": "Search", "head": "Search", "post": "Create", "put": "ConditionalUpdate",
               "patch": "ConditionalPatch", "delete": "ConditionalDelete"}  # fmt: skip


class Route(NamedTuple):
    """The route parameters of a path and the operation id, when the path is a FHIR-style route."""

    params: Mapping[str, str]
    operation: str | None


_NONE = Route(MappingProxyType({}), None)
_RPC = Route(MappingProxyType({}), "rpc")


ROUTE_MEMO_ENTRIES = 4096  # paths are the client's: bounded (functools' LRU, thread-safe)


@functools.lru_cache(maxsize=ROUTE_MEMO_ENTRIES)
def route(method: str, path: str) -> Route:
    """The route of `path` (no query) for a lower-case method; no params and no operation if it is
    not a FHIR-style route. Remembered for the most recent paths (a Check asks twice: for
    `unrouted` and for the context), its params read-only so no caller can change a remembered one."""
    found = _route(method, path)
    return found if found.params is _NONE.params else Route(MappingProxyType(dict(found.params)), found.operation)


def _route(method: str, path: str) -> Route:
    first = path[1:2]
    # Most paths of a non-FHIR API end here: a route starts with a type, fhir, Organization, rpc or $.
    if not path.startswith("/") or not ("A" <= first <= "Z" or first in "fr$/" or path == "/"):
        return _NONE
    # A FHIR server ignores empty segments (`/fhir/Patient/`, `//`): so do we.
    parts = (
        [segment for segment in path.split("/") if segment]
        if "//" in path or path.endswith("/")
        else path.split("/")[1:]
    )
    if len(parts) > 7:
        return _NONE
    params: dict[str, str] = {}
    if len(parts) >= 3 and parts[0] == "Organization" and _ID.fullmatch(parts[1]) and parts[2] == "fhir":
        params[ORGANIZATION_ID] = parts[1]
        parts = parts[2:]
    if parts == ["rpc"] and not params:
        # Aidbox's RPC endpoint (the method is in the body or `_m`): the Operation `rpc`.
        return _RPC if method == "post" else _NONE
    prefix = ""
    if parts and parts[0] == "fhir":
        prefix = "Fhir"
        parts = parts[1:]
    if not parts:
        # The base: a POST is a transaction (or batch) bundle.
        return Route(params, prefix + "Transaction") if method == "post" else _NONE
    if len(parts) == 1 and _OPERATION.fullmatch(parts[0]):
        params[OPERATION_NAME] = parts[0]
        return Route(params, prefix + "Operation")
    if not _TYPE.fullmatch(parts[0]):
        return _NONE
    params[RESOURCE_TYPE] = parts[0]
    rest = parts[1:]
    interaction: str | None = None
    if not rest:
        interaction = _TYPE_LEVEL.get(method)
    elif rest == ["_history"] and method == "get":
        interaction = "History"
    elif rest == ["_search"] and method == "post":
        interaction = "Search"
    elif len(rest) == 1 and _OPERATION.fullmatch(rest[0]):
        params[OPERATION_NAME] = rest[0]
        interaction = "Operation"
    elif _ID.fullmatch(rest[0]) and rest[0] not in ("_history", "_search"):
        params[RESOURCE_ID] = rest[0]
        tail = rest[1:]
        if not tail:
            interaction = _INSTANCE.get(method)
        elif tail == ["_history"] and method == "get":
            interaction = "History"
        elif len(tail) == 2 and tail[0] == "_history" and _ID.fullmatch(tail[1]) and method == "get":
            params[RESOURCE_VERSION] = tail[1]
            interaction = "Vread"
        elif len(tail) == 1 and _OPERATION.fullmatch(tail[0]):
            params[OPERATION_NAME] = tail[0]
            interaction = "Operation"
        elif len(tail) == 1 and _TYPE.fullmatch(tail[0]) and method == "get":
            interaction = "CompartmentSearch"  # /Patient/pt-1/Observation: the compartment's type and id
        else:
            return _NONE
    else:
        return _NONE
    # A shape the method does not take (POST /fhir/Patient/pt-1) is no route: no params either.
    return _NONE if interaction is None else Route(params, prefix + interaction)


def unrouted(method: str, target: str) -> bool:
    """Whether `target` (a normalized path with its query) is FHIR-shaped but no route for `method`
    (any case); a `;` in a FHIR-shaped path makes it none (see the module docstring)."""
    path = target.partition("?")[0]
    first = path[1:2]
    # Most paths end here: only a resource type (capitalized), fhir or `$` starts a FHIR shape.
    if not ("A" <= first <= "Z" or first == "f" or first == "$"):
        return False
    if ";" not in path and route(method.lower(), path).operation is not None:
        return False  # a route (most FHIR-shaped paths): policies judge it
    parts = [segment.partition(";")[0] for segment in path.split("/") if segment]
    if len(parts) >= 3 and parts[0] == "Organization" and parts[2] == "fhir":
        parts = parts[3:]
    elif parts and parts[0] == "fhir":
        parts = parts[1:]
    elif parts and parts[0] not in RESOURCE_TYPES:
        # At the root (Aidbox's own API) only a known resource type makes a FHIR shape: a generic
        # upstream's `/Content/logo.png` or `/Reports/q3` is judged by policies as it is.
        return False
    # `/fhir/metadata`, `/fhir/.well-known/...`: FHIR's, but no resource route; policies judge them.
    return bool(parts) and (_TYPE.fullmatch(parts[0]) is not None or parts[0][:1] == "$")


_REFERENCE = re.compile(f"({_TYPE_PATTERN})/({_ID_PATTERN})(?:/_history/{_ID_PATTERN})?")


def parse_reference(value: Any) -> dict[str, Any] | None:
    """A FHIR reference in Aidbox's format: `"Patient/pt-1"` or `{reference: "Patient/pt-1", ...}`
    becomes `{resourceType: Patient, id: pt-1, ...}` (a map already in that form stays as it is).
    Only relative references parse: an absolute URL names a resource on some server, possibly
    another one, and a contained `#ref` none at all."""
    if isinstance(value, str):
        found = _REFERENCE.fullmatch(value)
        return {"resourceType": found[1], "id": found[2]} if found else None
    if not isinstance(value, Mapping):
        return None
    reference = value.get("reference")
    if reference is None:
        has_form = isinstance(value.get("resourceType"), str) and isinstance(value.get("id"), str)
        return dict(value) if has_form else None
    parsed = parse_reference(reference) if isinstance(reference, str) else None
    if parsed is None:
        return None
    return {**{key: item for key, item in value.items() if key != "reference"}, **parsed}


def with_aidbox_references(value: Any) -> Any:
    """`value` with every FHIR reference map (`{reference: "Practitioner/pr-1"}`) also given the
    `resourceType` and `id` Aidbox stores it with, at any depth, so a policy reading
    `.role.0.links.practitioner.id` finds what Aidbox would. `reference` itself is kept."""
    if isinstance(value, Mapping):
        result = {key: with_aidbox_references(item) for key, item in value.items()}
        reference = result.get("reference")
        if isinstance(reference, str) and "id" not in result and "resourceType" not in result:
            parsed = parse_reference(reference)
            if parsed is not None:
                result.update(parsed)
        return result
    if isinstance(value, list):
        return [with_aidbox_references(item) for item in value]
    return value
