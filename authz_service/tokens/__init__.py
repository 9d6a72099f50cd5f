"""Credential kinds: where tokens come from and how each kind is verified."""
