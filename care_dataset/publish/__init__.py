"""care-publish: a converted folder -> a Hugging Face dataset folder (Parquet shards and dataset card)."""
