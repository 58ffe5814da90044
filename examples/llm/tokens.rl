# Tokens per tenant in front of an OpenAI-compatible API (docs/deployment.md, "Limiting LLM
# tokens"). Run it with:
#   tollgate serve --policies examples/llm --upstream http://127.0.0.1:8000
# The tenant is the API key (hashed before any use); requests without one count by address.
namespace "llm";

# What a request really used, read from the response — the JSON body's `usage`, or the last
# event of a stream — and settled against what it reserved: the request's own `max_tokens`
# (from its JSON body), 1,000 when it does not say, at most 32,000.
limit tokens_per_minute {
  match { route POST "/v1/chat/completions", "/v1/completions"; }
  key first_of(api_token, ip);
  algorithm sliding_window;
  rate 100_000/min;
  cost response json("usage.prompt_tokens") + json("usage.completion_tokens") max 200_000;
  reserve json("max_tokens") default 1_000 max 32_000;
}

# A daily budget on the same usage, output tokens weighing four times input tokens.
limit weighted_tokens_per_day {
  match { route POST "/v1/chat/completions", "/v1/completions"; }
  key first_of(api_token, ip);
  algorithm quota;
  rate 20_000_000/day;
  cost response json("usage.prompt_tokens") + 4 * json("usage.completion_tokens");
  reserve json("max_tokens") default 4_000 max 128_000;
}

# And requests in flight, so that one tenant cannot hold every slot of the upstream.
limit streams_in_flight {
  match { route POST "/v1/chat/completions"; }
  key first_of(api_token, ip);
  rate 8 concurrent;
  lease 10min;
}
