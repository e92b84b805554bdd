"""Small helpers with no project imports, each needed by more than one room (one home each):

    common.text   CJK (the CJK character/punctuation ranges), char_bigrams(text)
    common.files  sha256_file(path), now_iso()
    common.cpu    cpu_flags() (/proc/cpuinfo), has_native_bf16()

The bottom of the import rule: every room may import `common`; `common` imports no room.
"""
