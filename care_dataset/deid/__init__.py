"""De-identification: keyed pseudonyms and case IDs, care-anonymize (PS3.15 Annex E) and care-verify."""
