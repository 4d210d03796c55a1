"""Test agent: one chat completion through the gateway with the openai
package, as the environment `aiosctl run` gives it says (OPENAI_BASE_URL,
OPENAI_API_KEY); prints what it used as JSON (its key too: it is refused
once the agent has ended)."""

import json
import os

import openai

client = openai.OpenAI(max_retries=0, timeout=300)
reply = client.chat.completions.create(
    model=client.models.list().data[0].id, max_tokens=4,
    messages=[{"role": "user", "content": "Say hi."}])
print(json.dumps({"base_url": os.environ["OPENAI_BASE_URL"], "key": os.environ["OPENAI_API_KEY"],
                  "usage": reply.usage.model_dump()}))
