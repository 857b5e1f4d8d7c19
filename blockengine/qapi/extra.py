"""Hand-written QAPI definitions that tools/gen_qapi.py merges into schema.py.

block-core.qapi references types QEMU defines in its common, sockets, crypto and
control schemas, and predates commands and members that QEMU 7.2 has and blockengine
implements.  They are written here in the generated module's normalized form:

- ENUMS: name -> list of values
- STRUCTS: name -> {'base'?: name, 'data': {member: type}}
- UNIONS: name -> {'base': name | {member: type}, 'discriminator': member,
            'data': {value: type}}
- ALTERNATES: name -> {branch: type}
- COMMANDS: name -> {'data'?: {member: type} | type name, 'boxed'?: True, 'returns'?: type}
- EVENTS: name -> {'data'?: {member: type}}

A member named '*m' is optional; a type is a name or a one-element list (an array).
MEMBER_UPDATES adds members to (or retypes members of) block-core definitions.

Keep this module free of imports: the generator loads it by path.
"""

ENUMS = {
    'QapiErrorClass': ['GenericError', 'CommandNotFound', 'DeviceNotActive',
                       'DeviceNotFound', 'DeviceEncrypted', 'KVMMissingCap'],
    'IoOperationType': ['read', 'write'],
    'QuorumOpType': ['read', 'write', 'flush'],
    'OnOffAuto': ['auto', 'on', 'off'],
    'SocketAddressType': ['inet', 'unix', 'vsock', 'fd'],
    'QCryptoCipherAlgorithm': ['aes-128', 'aes-192', 'aes-256', 'des', '3des', 'cast5-128',
                               'serpent-128', 'serpent-192', 'serpent-256',
                               'twofish-128', 'twofish-192', 'twofish-256'],
    'QCryptoCipherMode': ['ecb', 'cbc', 'xts', 'ctr'],
    'QCryptoIVGenAlgorithm': ['plain', 'plain64', 'essiv'],
    'QCryptoHashAlgorithm': ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512',
                             'ripemd160'],
    'QMPCapability': ['oob'],
    'BitmapSyncMode': ['on-success', 'never', 'always'],
    'JobType': ['commit', 'stream', 'mirror', 'backup', 'create', 'amend',
                'snapshot-load', 'snapshot-save', 'snapshot-delete'],
    'JobStatus': ['undefined', 'created', 'running', 'paused', 'ready', 'standby',
                  'waiting', 'pending', 'aborting', 'concluded', 'null'],
    'MirrorCopyMode': ['background', 'write-blocking'],
    # blockdev-create (QEMU 7.2's block-core.json and crypto.json)
    'BlockdevQcow2Version': ['v2', 'v3'],
    'Qcow2CompressionType': ['zlib', 'zstd'],
    'BlockdevVmdkSubformat': ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse',
                              'twoGbMaxExtentFlat', 'streamOptimized'],
    'BlockdevVmdkAdapterType': ['ide', 'buslogic', 'lsilogic', 'legacyESX'],
    'BlockdevVhdxSubformat': ['dynamic', 'fixed'],
    'BlockdevVpcSubformat': ['dynamic', 'fixed'],
    'QCryptoBlockFormat': ['qcow', 'luks'],
    'BlockdevQcow2EncryptionFormat': ['aes', 'luks'],
    'RbdImageEncryptionFormat': ['luks', 'luks2'],
}

STRUCTS = {
    'InetSocketAddressBase': {'data': {'host': 'str', 'port': 'str'}},
    'InetSocketAddress': {'base': 'InetSocketAddressBase',
                          'data': {'*numeric': 'bool', '*to': 'uint16',
                                   '*ipv4': 'bool', '*ipv6': 'bool'}},
    'UnixSocketAddress': {'data': {'path': 'str'}},
    'VsockSocketAddress': {'data': {'cid': 'str', 'port': 'str'}},
    'String': {'data': {'str': 'str'}},
    'QCryptoBlockInfoLUKSSlot': {'data': {'active': 'bool', '*iters': 'int',
                                          '*stripes': 'int', 'key-offset': 'int'}},
    'QCryptoBlockInfoLUKS': {'data': {'cipher-alg': 'QCryptoCipherAlgorithm',
                                      'cipher-mode': 'QCryptoCipherMode',
                                      'ivgen-alg': 'QCryptoIVGenAlgorithm',
                                      '*ivgen-hash-alg': 'QCryptoHashAlgorithm',
                                      'hash-alg': 'QCryptoHashAlgorithm',
                                      'payload-offset': 'int',
                                      'master-key-iters': 'int',
                                      'uuid': 'str',
                                      'slots': ['QCryptoBlockInfoLUKSSlot']}},
    'VersionTriple': {'data': {'major': 'int', 'minor': 'int', 'micro': 'int'}},
    'VersionInfo': {'data': {'qemu': 'VersionTriple', 'package': 'str'}},
    'CommandInfo': {'data': {'name': 'str'}},
    'JobInfo': {'data': {'id': 'str', 'type': 'JobType', 'status': 'JobStatus',
                         'current-progress': 'int', 'total-progress': 'int',
                         '*error': 'str'}},
    'BlockdevOptionsCor': {'base': 'BlockdevOptionsGenericFormat',
                           'data': {'*bottom': 'str'}},
    # blockdev-create (QEMU 7.2)
    'QCryptoBlockOptionsQCow': {'data': {'*key-secret': 'str'}},
    'QCryptoBlockOptionsLUKS': {'data': {'*key-secret': 'str'}},
    'QCryptoBlockCreateOptionsLUKS': {'base': 'QCryptoBlockOptionsLUKS',
                                      'data': {'*cipher-alg': 'QCryptoCipherAlgorithm',
                                               '*cipher-mode': 'QCryptoCipherMode',
                                               '*ivgen-alg': 'QCryptoIVGenAlgorithm',
                                               '*ivgen-hash-alg': 'QCryptoHashAlgorithm',
                                               '*hash-alg': 'QCryptoHashAlgorithm',
                                               '*iter-time': 'int'}},
    'RbdEncryptionCreateOptionsLUKSBase': {'data': {'key-secret': 'str',
                                                    '*cipher-alg': 'QCryptoCipherAlgorithm'}},
    'BlockdevCreateOptionsFile': {'data': {'filename': 'str', 'size': 'size',
                                           '*preallocation': 'PreallocMode',
                                           '*nocow': 'bool', '*extent-size-hint': 'size'}},
    'BlockdevCreateOptionsGluster': {'data': {'location': 'BlockdevOptionsGluster',
                                              'size': 'size',
                                              '*preallocation': 'PreallocMode'}},
    'BlockdevCreateOptionsLUKS': {'base': 'QCryptoBlockCreateOptionsLUKS',
                                  'data': {'file': 'BlockdevRef', 'size': 'size',
                                           '*preallocation': 'PreallocMode'}},
    'BlockdevCreateOptionsNfs': {'data': {'location': 'BlockdevOptionsNfs', 'size': 'size'}},
    'BlockdevCreateOptionsParallels': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                                '*cluster-size': 'size'}},
    'BlockdevCreateOptionsQcow': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                           '*backing-file': 'str',
                                           '*encrypt': 'QCryptoBlockCreateOptions'}},
    'BlockdevCreateOptionsQcow2': {'data': {'file': 'BlockdevRef',
                                            '*data-file': 'BlockdevRef',
                                            '*data-file-raw': 'bool',
                                            '*extended-l2': 'bool',
                                            'size': 'size',
                                            '*version': 'BlockdevQcow2Version',
                                            '*backing-file': 'str',
                                            '*backing-fmt': 'BlockdevDriver',
                                            '*encrypt': 'QCryptoBlockCreateOptions',
                                            '*cluster-size': 'size',
                                            '*preallocation': 'PreallocMode',
                                            '*lazy-refcounts': 'bool',
                                            '*refcount-bits': 'int',
                                            '*compression-type': 'Qcow2CompressionType'}},
    'BlockdevCreateOptionsQed': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                          '*backing-file': 'str',
                                          '*backing-fmt': 'BlockdevDriver',
                                          '*cluster-size': 'size', '*table-size': 'int'}},
    'BlockdevCreateOptionsRbd': {'data': {'location': 'BlockdevOptionsRbd', 'size': 'size',
                                          '*cluster-size': 'size',
                                          '*encrypt': 'RbdImageEncryptionCreateOptions'}},
    'BlockdevCreateOptionsSsh': {'data': {'location': 'BlockdevOptionsSsh', 'size': 'size'}},
    'BlockdevCreateOptionsVdi': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                          '*preallocation': 'PreallocMode'}},
    'BlockdevCreateOptionsVhdx': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                           '*log-size': 'size', '*block-size': 'size',
                                           '*subformat': 'BlockdevVhdxSubformat',
                                           '*block-state-zero': 'bool'}},
    'BlockdevCreateOptionsVmdk': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                           '*extents': ['BlockdevRef'],
                                           '*subformat': 'BlockdevVmdkSubformat',
                                           '*backing-file': 'str',
                                           '*adapter-type': 'BlockdevVmdkAdapterType',
                                           '*hwversion': 'str', '*toolsversion': 'str',
                                           '*zeroed-grain': 'bool'}},
    'BlockdevCreateOptionsVpc': {'data': {'file': 'BlockdevRef', 'size': 'size',
                                          '*subformat': 'BlockdevVpcSubformat',
                                          '*force-size': 'bool'}},
}

UNIONS = {
    'SocketAddress': {'base': {'type': 'SocketAddressType'},
                      'discriminator': 'type',
                      'data': {'inet': 'InetSocketAddress',
                               'unix': 'UnixSocketAddress',
                               'vsock': 'VsockSocketAddress',
                               'fd': 'String'}},
    'BlockdevQcow2Encryption': {'base': {'format': 'BlockdevQcow2EncryptionFormat'},
                                'discriminator': 'format',
                                'data': {'aes': 'QCryptoBlockOptionsQCow',
                                         'luks': 'QCryptoBlockOptionsLUKS'}},
    'QCryptoBlockCreateOptions': {'base': {'format': 'QCryptoBlockFormat'},
                                  'discriminator': 'format',
                                  'data': {'qcow': 'QCryptoBlockOptionsQCow',
                                           'luks': 'QCryptoBlockCreateOptionsLUKS'}},
    'RbdImageEncryptionCreateOptions': {'base': {'format': 'RbdImageEncryptionFormat'},
                                        'discriminator': 'format',
                                        'data': {'luks': 'RbdEncryptionCreateOptionsLUKSBase',
                                                 'luks2': 'RbdEncryptionCreateOptionsLUKSBase'}},
    'BlockdevCreateOptions': {'base': {'driver': 'BlockdevDriver'},
                              'discriminator': 'driver',
                              'data': {'file': 'BlockdevCreateOptionsFile',
                                       'gluster': 'BlockdevCreateOptionsGluster',
                                       'luks': 'BlockdevCreateOptionsLUKS',
                                       'nfs': 'BlockdevCreateOptionsNfs',
                                       'parallels': 'BlockdevCreateOptionsParallels',
                                       'qcow': 'BlockdevCreateOptionsQcow',
                                       'qcow2': 'BlockdevCreateOptionsQcow2',
                                       'qed': 'BlockdevCreateOptionsQed',
                                       'rbd': 'BlockdevCreateOptionsRbd',
                                       'ssh': 'BlockdevCreateOptionsSsh',
                                       'vdi': 'BlockdevCreateOptionsVdi',
                                       'vhdx': 'BlockdevCreateOptionsVhdx',
                                       'vmdk': 'BlockdevCreateOptionsVmdk',
                                       'vpc': 'BlockdevCreateOptionsVpc'}},
}

ALTERNATES = {
    'BlockdevRefOrNull': {'definition': 'BlockdevOptions', 'reference': 'str', 'null': 'null'},
    'BlockDirtyBitmapOrStr': {'local': 'str', 'external': 'BlockDirtyBitmap'},
}

_JOB_ID = {'data': {'id': 'str'}}

COMMANDS = {
    'qmp_capabilities': {'data': {'*enable': ['QMPCapability']}},
    'query-version': {'returns': 'VersionInfo'},
    'query-commands': {'returns': ['CommandInfo']},
    'quit': {},
    'query-jobs': {'returns': ['JobInfo']},
    'job-pause': _JOB_ID,
    'job-resume': _JOB_ID,
    'job-cancel': _JOB_ID,
    'job-complete': _JOB_ID,
    'job-dismiss': _JOB_ID,
    'job-finalize': _JOB_ID,
    'block-job-dismiss': _JOB_ID,
    'block-job-finalize': _JOB_ID,
    'blockdev-create': {'data': {'job-id': 'str', 'options': 'BlockdevCreateOptions'}},
    'block-dirty-bitmap-enable': {'data': 'BlockDirtyBitmap'},
    'block-dirty-bitmap-disable': {'data': 'BlockDirtyBitmap'},
    'block-dirty-bitmap-merge': {'data': {'node': 'str', 'target': 'str',
                                          'bitmaps': ['BlockDirtyBitmapOrStr']}},
}

EVENTS = {
    'JOB_STATUS_CHANGE': {'data': {'id': 'str', 'status': 'JobStatus'}},
    'BLOCK_JOB_PENDING': {'data': {'type': 'JobType', 'id': 'str'}},
    # from QEMU's block.json / quorum schema, emitted by devices and the quorum driver
    'DEVICE_TRAY_MOVED': {'data': {'device': 'str', 'id': 'str', 'tray-open': 'bool'}},
    'QUORUM_FAILURE': {'data': {'reference': 'str', 'sector-num': 'int',
                                'sectors-count': 'int'}},
    'QUORUM_REPORT_BAD': {'data': {'type': 'QuorumOpType', '*error': 'str',
                                   'node-name': 'str', 'sector-num': 'int',
                                   'sectors-count': 'int'}},
}

_JOB_AUTO = {'*auto-finalize': 'bool', '*auto-dismiss': 'bool'}
_BACKUP_7_2 = {'*bitmap-mode': 'BitmapSyncMode', '*filter-node-name': 'str'}

# values QEMU 7.2 added to block-core enums
ENUM_ADDITIONS = {
    'MirrorSyncMode': ['bitmap'],
    'BlockdevDriver': ['copy-on-read', 'compress'],
}

MEMBER_UPDATES = {
    'UNIONS': {
        'BlockdevOptions': {'copy-on-read': 'BlockdevOptionsCor',
                            'compress': 'BlockdevOptionsGenericFormat'},
    },
    'STRUCTS': {
        'BlockDirtyBitmapAdd': {'*persistent': 'bool', '*disabled': 'bool'},
        'BlockdevOptionsGenericCOWFormat': {'*backing': 'BlockdevRefOrNull'},
        'BlockdevOptionsQcow2': {'*encrypt': 'BlockdevQcow2Encryption',
                                 '*data-file': 'BlockdevRef'},
        'DriveBackup': {**_JOB_AUTO, **_BACKUP_7_2},
        'BlockdevBackup': {**_JOB_AUTO, **_BACKUP_7_2, '*bitmap': 'str'},
        'DriveMirror': {**_JOB_AUTO, '*copy-mode': 'MirrorCopyMode'},
    },
    'COMMANDS': {
        'block-stream': {**_JOB_AUTO, '*bottom': 'str', '*filter-node-name': 'str'},
        'block-commit': {**_JOB_AUTO, '*base-node': 'str', '*top-node': 'str',
                         '*on-error': 'BlockdevOnError'},
        'blockdev-mirror': {**_JOB_AUTO, '*copy-mode': 'MirrorCopyMode'},
        'query-named-block-nodes': {'*flat': 'bool'},
    },
}
