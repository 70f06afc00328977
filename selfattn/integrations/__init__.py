"""Bridges from other libraries to selfattn's kernels; each submodule imports
its library only when used (transformers: `selfattn.integrations.transformers`)."""
