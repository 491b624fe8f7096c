"""The policy: strict YAML loading, the schema and its checks, and the node facts it resolves."""
