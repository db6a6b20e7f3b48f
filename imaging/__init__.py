"""Reading a disk into fleetcast image blocks: shared by the server's capture and the client's.

stdlib + ``protocol`` only (the boot image carries it beside ``client``); neither ``server``
nor ``client`` is imported here. ``usedmap`` finds the bytes filesystems use (partclone);
``walk`` fills a manifest's partition table and walks the disk block by block.
"""
