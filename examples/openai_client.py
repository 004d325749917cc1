"""Any OpenAI client works against the gateway: point base_url at it.

    keel serve --config examples/simulated.yaml        # in one terminal (or `make run` for the embedded model)
    python examples/openai_client.py sim               # in another; the argument is the model name
"""

import os
import sys

from openai import OpenAI

model = sys.argv[1] if len(sys.argv) > 1 else "local"
client = OpenAI(base_url=os.environ.get("KEEL_URL", "http://127.0.0.1:8080/v1"),
                api_key=os.environ.get("KEEL_MASTER_KEY", "not-needed-without-a-master-key"))

reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}])
print(reply.choices[0].message.content)

stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to 5."}], stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
