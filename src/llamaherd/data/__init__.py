"""Training data: instruction / conversation / text datasets, loss masking, packing and batching; preference
pairs for reward models and DPO."""

from llamaherd.data.preference import (
    MARGIN_TABLES,
    PreferencePair,
    PreferenceStats,
    collate_pairs,
    load_preference_data,
    split_pairs,
)
from llamaherd.data.sft import (
    IGNORE_INDEX,
    Record,
    Sample,
    SFTData,
    SFTStats,
    collate,
    encode_conversation,
    load_sft_data,
    pack,
    read_records,
    record_to_messages,
    response_spans,
    split_validation,
)

__all__ = [
    "IGNORE_INDEX", "MARGIN_TABLES", "PreferencePair", "PreferenceStats", "Record", "SFTData", "SFTStats", "Sample",
    "collate", "collate_pairs", "encode_conversation", "load_preference_data", "load_sft_data", "pack",
    "read_records", "record_to_messages", "response_spans", "split_pairs", "split_validation",
]
