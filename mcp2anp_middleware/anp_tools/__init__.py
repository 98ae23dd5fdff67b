"""The ANP side: the two tools (``anp_fetchDoc``, ``anp_invokeOpenRPC``) and what they use to reach
agents: the pooled HTTP client, DID WBA signing, the URL policy, document handling and caching,
DID credentials and the development identity."""
