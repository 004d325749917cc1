"""The APIs clients speak besides chat completions: the OpenAI Responses API, Anthropic's Messages API
and legacy completions, each translated to and from the one internal call (docs/dialects.md)."""
