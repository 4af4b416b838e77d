"""Head patterns, page statistics, page selection and calibration (sparsity issues)."""
