"""CA, SPIFFE SVID issuance, CSR API, rotation, trust bundles."""
