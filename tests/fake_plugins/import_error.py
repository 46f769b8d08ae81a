"""A plugin whose import fails, like one with a missing dependency. Only ever imported as a fake distribution."""

raise ImportError("No module named 'fancy_kernels' (fake missing dependency)")
