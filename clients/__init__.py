"""Clients of the maas gateway."""
