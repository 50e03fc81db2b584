"""Hardware profiles: YAML files validated by `schema.Profile`. A name refers to a shipped file
in this folder; a path to a user's own YAML works wherever a name does."""

from .schema import Efficiency, Profile, list_profiles, load_profile

__all__ = ["Efficiency", "Profile", "list_profiles", "load_profile"]
