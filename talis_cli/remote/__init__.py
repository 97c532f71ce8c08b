"""The CLI as a client of `talis serve`: `talis generate --url` and `talis chat --url` send their prompts to a
running server over its OpenAI-compatible API and show the replies as the local commands do.

client.py speaks HTTP (httpx, server-sent events); generate.py runs one-shot prompts (concurrent with
--each-line, results in input order); chat.py is the chat session whose replies come from the server.
No model, torch or tokenizer is loaded on this side: the server renders, tokenizes and generates.
"""
