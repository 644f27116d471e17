"""The ShadowNet trusted app's "header": its UUID and command ids, shared with the normal-world client."""

import uuid

UUID = uuid.UUID("5a0058b2-90b6-4dbe-9365-f4136b27e8af")
