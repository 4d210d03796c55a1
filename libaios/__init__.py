"""libaios: what an agent imports to make system calls to the AIOS kernel.

A dozen lines make an agent::

    import libaios

    with libaios.connect() as aios:
        reply = aios.chat("Name three colours.", max_tokens=40)
        print(reply.text)
"""

from .client import ChatResult, Client, connect
from .errors import AIOSError
from .protocol import ErrorCode, MsgType

__version__ = "0.1.0"

__all__ = ["AIOSError", "ChatResult", "Client", "ErrorCode", "MsgType", "connect", "__version__"]
