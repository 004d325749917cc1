"""Any OpenAI client works against the gateway: point base_url at it.

    make run                                        # in one terminal: the embedded model as "local"
    python examples/openai_client.py                # in another (venv activated, openai installed)
    python examples/openai_client.py sim --url http://127.0.0.1:8081/v1   # another model and address

The address is --url, else $KEEL_URL, else http://127.0.0.1:8080/v1 (where `make run` serves);
the key is $KEEL_MASTER_KEY when the gateway has one.
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser(description="A plain and a streamed chat call through Keel.")
parser.add_argument("model", nargs="?", default="local", help="the model name in keel.yaml (default: local)")
parser.add_argument("--url", default=os.environ.get("KEEL_URL", "http://127.0.0.1:8080/v1"),
                    help="the gateway's /v1 address (default: $KEEL_URL, else http://127.0.0.1:8080/v1)")
args = parser.parse_args()

client = OpenAI(base_url=args.url, api_key=os.environ.get("KEEL_MASTER_KEY", "not-needed-without-a-master-key"))

reply = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "Say hello."}])
print(reply.choices[0].message.content)

stream = client.chat.completions.create(
    model=args.model, messages=[{"role": "user", "content": "Count to 5."}], stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
