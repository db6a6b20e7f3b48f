"""The sender's asyncio shell around protocol.sender.SenderSession (docs/PROTOCOL.md)."""
