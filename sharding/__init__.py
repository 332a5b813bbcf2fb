"""The ring that maps red packets to shards, and the tools that change it live."""
