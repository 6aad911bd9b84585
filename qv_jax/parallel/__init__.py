"""Context parallelism: one sample's frames and merged sequence spread over the `context` mesh axis."""
