"""Integrations of sfattn with model libraries (diffusers)."""
