"""Data: turning a corpus into token files (`prepare`) and reading them back in batches (`loader`).

Reading a SOURCE: one reader per kind of input (text_files: text and JSON, parquet_files, hf_dataset,
builtin_sources), all built on chunks; sources picks among them and gives the text path its stream of
document chunks (each record's --text-field); conversations reads the same inputs' records as messages.
Writing: prepare (text: resumable token shards) and chat_prepare (conversations: tokens + loss masks)
both write their data directory and manifest through shards. Reading back: loader (token files, batches)
and chat_loader (packed conversations, masked targets).
"""
