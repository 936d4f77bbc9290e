"""Model directories in the node's storage paths: metadata, verification and atomic publishing
(``model_store``), what is stored (``inventory``, ``model_shape``, ``mlx_files``), files checked as
they are served (``file_serving``) and the background re-check of stored files (``scrub``).
"""
