"""Keel in-process, from code without an event loop: `chat_sync` runs the pipeline on a
background loop that lives as long as the process (pools and models stay warm between calls).

    python examples/library_sync.py
"""

from pathlib import Path

from keel import Keel, KeelError

keel = Keel.from_config(Path(__file__).with_name("simulated.yaml"))

reply = keel.chat_sync(model="flaky", messages=[{"role": "user", "content": "are you there?"}])
print(reply.choices[0].message.content)  # the first deployment's echo, or the backup's

for chunk in keel.chat_sync(model="sim", messages=[{"role": "user", "content": "stream me"}], stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

try:
    keel.chat_sync(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
except KeelError as exc:
    print(exc.status, exc.code)  # 404 model_not_found

keel.close_sync()
