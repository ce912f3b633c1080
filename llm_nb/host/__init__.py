"""The model host: one process per Jupyter server that owns every loaded model.

Nothing on the kernel side imports this package.
"""
