"""Data: turning a corpus into token files (`prepare`) and reading them back in batches (`loader`)."""
