"""`talis chat`: an interactive prompt-toolkit REPL around a ChatSession (the only place for prompt_toolkit)."""
