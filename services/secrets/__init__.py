"""The secrets service: a user's secrets in Vault, write-only through the API, resolved for the
executor through an internal RPC that acts only for the user of the request."""
