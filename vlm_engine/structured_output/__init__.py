"""Structured outputs: outputs held to a JSON schema, a regular expression, a list of choices or
a grammar, token by token, with xgrammar. `grammars` checks and compiles constraints (the frontend
checks each request's before it runs); `manager` keeps the core's compiled grammars, a matcher
per request and each step's next-token bitmask."""
