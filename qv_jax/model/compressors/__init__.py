"""Pluggable video compressors: the contract (`base`), the registry (`registry`) and the kinds."""
