"""Training data: JSONL manifests (schema, validation report), tokenization with label masks from the
chat template, datasets with log-mel features, collation and length-grouped global batches."""

from .dataset import Collator, ManifestDataset, global_batches, rank_micro_batches, validate
from .encode import TokenizedSequence, chat_segments, clip_token_count, tokenize_example
from .manifest import STAGES, Example, ManifestError, Report, parse_row, read_manifest

__all__ = ["Collator", "ManifestDataset", "global_batches", "rank_micro_batches", "validate", "TokenizedSequence",
           "chat_segments", "clip_token_count", "tokenize_example", "STAGES", "Example", "ManifestError", "Report",
           "parse_row", "read_manifest"]
