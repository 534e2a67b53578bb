"""Graph passes: detection (front-ends), planning (IR-neutral) and rewriting (front-ends)."""
