"""Task logic of the experiments (one subpackage per experiment), shared by notebooks and tests."""
