"""What every API shares on the wire: errors, SSE, request bodies and deadlines, admission, keys, draining."""
