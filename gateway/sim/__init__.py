"""HeyGen-in-a-box: a local stand-in for the streaming-avatar clouds, for development and tests.

A LiveKit-compatible signaling + media server (:mod:`gateway.sim.livekit`) whose ``heygen``
participant is the embedded local avatar (:mod:`gateway.sim.room`), plus emulations of the
HeyGen / LiveAvatar REST APIs that create and close its rooms. The real ``livekit`` SDKs join
it exactly as they would join a HeyGen session; nothing leaves the machine.
"""
