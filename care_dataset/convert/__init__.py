"""care-convert: raw cases -> de-identified, slice-filtered, patient-split converted folder."""
