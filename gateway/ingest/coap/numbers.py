"""CoAP numbers as plain ints, named as aiocoap names them (aiocoap.numbers).

Plain ints keep the hot path free of enum look-ups; the names stay aiocoap's.
"""

from __future__ import annotations

from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type

CON, NON, ACK, RST = int(Type.CON), int(Type.NON), int(Type.ACK), int(Type.RST)

EMPTY = int(Code.EMPTY)
GET, POST, PUT, DELETE = int(Code.GET), int(Code.POST), int(Code.PUT), int(Code.DELETE)
CREATED = int(Code.CREATED)
DELETED = int(Code.DELETED)
CHANGED = int(Code.CHANGED)
CONTENT = int(Code.CONTENT)
CONTINUE = int(Code.CONTINUE)
BAD_REQUEST = int(Code.BAD_REQUEST)
UNAUTHORIZED = int(Code.UNAUTHORIZED)
BAD_OPTION = int(Code.BAD_OPTION)
FORBIDDEN = int(Code.FORBIDDEN)
PRECONDITION_FAILED = int(Code.PRECONDITION_FAILED)
NOT_FOUND = int(Code.NOT_FOUND)
METHOD_NOT_ALLOWED = int(Code.METHOD_NOT_ALLOWED)
REQUEST_ENTITY_INCOMPLETE = int(Code.REQUEST_ENTITY_INCOMPLETE)
REQUEST_ENTITY_TOO_LARGE = int(Code.REQUEST_ENTITY_TOO_LARGE)
UNSUPPORTED_CONTENT_FORMAT = int(Code.UNSUPPORTED_CONTENT_FORMAT)
TOO_MANY_REQUESTS = int(Code.TOO_MANY_REQUESTS)
INTERNAL_SERVER_ERROR = int(Code.INTERNAL_SERVER_ERROR)
SERVICE_UNAVAILABLE = int(Code.SERVICE_UNAVAILABLE)
PROXYING_NOT_SUPPORTED = int(Code.PROXYING_NOT_SUPPORTED)

URI_HOST = int(OptionNumber.URI_HOST)
URI_PORT = int(OptionNumber.URI_PORT)
URI_PATH = int(OptionNumber.URI_PATH)
LOCATION_PATH = int(OptionNumber.LOCATION_PATH)
OBSERVE = int(OptionNumber.OBSERVE)
CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
MAX_AGE = int(OptionNumber.MAX_AGE)
URI_QUERY = int(OptionNumber.URI_QUERY)
ACCEPT = int(OptionNumber.ACCEPT)
BLOCK1 = int(OptionNumber.BLOCK1)
BLOCK2 = int(OptionNumber.BLOCK2)
SIZE1 = int(OptionNumber.SIZE1)
SIZE2 = int(OptionNumber.SIZE2)
PROXY_URI = int(OptionNumber.PROXY_URI)
PROXY_SCHEME = int(OptionNumber.PROXY_SCHEME)
NO_RESPONSE = int(OptionNumber.NO_RESPONSE)

# Options this server understands; an unknown *critical* (odd) option is 4.02 (RFC 7252 5.4.1).
# If-Match and If-None-Match are critical and not evaluated here, so they get 4.02 too.
UNDERSTOOD_OPTIONS = frozenset({
    URI_HOST, int(OptionNumber.ETAG), OBSERVE, URI_PORT, URI_PATH,
    CONTENT_FORMAT, MAX_AGE, URI_QUERY, ACCEPT, BLOCK1, BLOCK2, SIZE1, SIZE2, NO_RESPONSE,
})

# RFC 7252 4.8.2, with the default transmission parameters.
EXCHANGE_LIFETIME_S = 247.0
CONTENT_FORMAT_TEXT = 0


def code_str(code: int) -> str:
    """`68` -> `"2.04"`."""
    return f"{code >> 5}.{code & 0x1F:02d}"
