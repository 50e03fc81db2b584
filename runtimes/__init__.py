"""Loading exported models in a runtime, generating, and measuring speed and accuracy."""
