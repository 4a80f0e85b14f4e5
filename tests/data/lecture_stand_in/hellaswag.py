"""A stand-in for build-nanogpt's hellaswag.py, which fetches the GPT-2 encoding when imported:
offline, a requests.ConnectionError (an OSError), not an ImportError."""

raise OSError("Max retries exceeded with url: /gpt-2/encodings/main/vocab.bpe")
