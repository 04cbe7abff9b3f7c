"""Stage 6: supervised fine-tuning on concept texts."""
