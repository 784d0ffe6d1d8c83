"""The converted folder (writer, reader, splits) and the published Hugging Face folder (layout, reader)."""
