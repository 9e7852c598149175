"""Training data: instruction / conversation / text datasets, loss masking, packing and batching."""

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
    "IGNORE_INDEX", "Record", "SFTData", "SFTStats", "Sample", "collate", "encode_conversation", "load_sft_data",
    "pack", "read_records", "record_to_messages", "response_spans", "split_validation",
]
