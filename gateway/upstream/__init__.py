"""Avatar upstreams: the embedded local avatar, and (later) HeyGen / LiveAvatar via LiveKit."""
