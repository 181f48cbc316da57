"""Model bundles shipped inside the package (the default one lives in sdk/bundles/default)."""
