"""cdep-exp: train networks whose explanations avoid features annotated as irrelevant."""
