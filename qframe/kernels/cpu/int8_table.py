"""The measured CPU int8 dispatch table (data; written by benchmarks/cpu_int8_table.py, do not edit).

``rows[isa]['classes']``: shape classes by largest M, each with median ms per implementation on a few
(K, N) shapes, and the machine the table was measured on. See qframe.kernels.cpu.select.
"""

TABLE = {
    'machine': {'date': '2026-12-04T22:42:20+00:00', 'cpu': 'AMD EPYC', 'arch': 'x86_64', 'cores': 2, 'isa_detected': 'avx512_vnni', 'int8_flags': ['avx2', 'avx512_bf16', 'avx512_vnni', 'avx512bw', 'avx512f', 'avx512vl'], 'torch': '2.13.0+cpu', 'python': '3.11.7'},
    'threads': 1,
    'command': 'python benchmarks/cpu_int8_table.py --threads 1 --rounds 11',
    'rows': {
        'avx512_vnni': {
            'isa': 'avx512_vnni',
            'kernel': 'AVX-512 VNNI',
            'env': {'QFRAME_CPU_ISA': 'avx512_vnni'},
            'classes': [
                {'m_max': 1, 'kn_max': 65536, 'shapes': [
                    {'m': 1, 'k': 576, 'n': 64, 'ms': {'float': 0.01798, 'fp32_mm': 0.00562, 'qframe': 0.00536, 'torch_int_mm': 0.00581}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 1, 'k': 1280, 'n': 10, 'ms': {'float': 0.01438, 'fp32_mm': 0.00368, 'qframe': 0.00444, 'torch_int_mm': 0.00512}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 1, 'kn_max': None, 'shapes': [
                    {'m': 1, 'k': 1152, 'n': 128, 'ms': {'float': 0.03536, 'fp32_mm': 0.01593, 'qframe': 0.00834, 'torch_int_mm': 0.0084}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 1, 'k': 2304, 'n': 256, 'ms': {'float': 0.08628, 'fp32_mm': 0.04257, 'qframe': 0.01481, 'torch_int_mm': 0.01467}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 1, 'k': 160, 'n': 960, 'ms': {'float': 0.03895, 'fp32_mm': 0.02066, 'qframe': 0.00984, 'torch_int_mm': 0.01012}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 8, 'kn_max': 65536, 'shapes': [
                    {'m': 8, 'k': 576, 'n': 64, 'ms': {'float': 0.02713, 'fp32_mm': 0.01197, 'qframe': 0.00777, 'torch_int_mm': 0.01124}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 8, 'k': 1280, 'n': 10, 'ms': {'float': 0.02174, 'fp32_mm': 0.00948, 'qframe': 0.00631, 'torch_int_mm': 0.00992}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 8, 'kn_max': None, 'shapes': [
                    {'m': 8, 'k': 1152, 'n': 128, 'ms': {'float': 0.0639, 'fp32_mm': 0.0411, 'qframe': 0.01611, 'torch_int_mm': 0.02364}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 8, 'k': 2304, 'n': 256, 'ms': {'float': 0.2044, 'fp32_mm': 0.15951, 'qframe': 0.04674, 'torch_int_mm': 0.0575}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 8, 'k': 160, 'n': 960, 'ms': {'float': 0.06701, 'fp32_mm': 0.04478, 'qframe': 0.01783, 'torch_int_mm': 0.02563}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 64, 'kn_max': 65536, 'shapes': [
                    {'m': 64, 'k': 576, 'n': 64, 'ms': {'float': 0.07309, 'fp32_mm': 0.05478, 'qframe': 0.02053, 'torch_int_mm': 0.02544}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 64, 'k': 1280, 'n': 10, 'ms': {'float': 0.07684, 'fp32_mm': 0.05718, 'qframe': 0.0175, 'torch_int_mm': 0.02327}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 64, 'kn_max': None, 'shapes': [
                    {'m': 64, 'k': 1152, 'n': 128, 'ms': {'float': 0.22801, 'fp32_mm': 0.20129, 'qframe': 0.05853, 'torch_int_mm': 0.07012}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 64, 'k': 2304, 'n': 256, 'ms': {'float': 1.05922, 'fp32_mm': 0.93388, 'qframe': 0.25173, 'torch_int_mm': 0.25347}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 64, 'k': 160, 'n': 960, 'ms': {'float': 0.24436, 'fp32_mm': 0.20895, 'qframe': 0.06677, 'torch_int_mm': 0.1221}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 512, 'kn_max': 65536, 'shapes': [
                    {'m': 512, 'k': 576, 'n': 64, 'ms': {'float': 0.43811, 'fp32_mm': 0.40239, 'qframe': 0.11761, 'torch_int_mm': 0.14001}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 512, 'k': 1280, 'n': 10, 'ms': {'float': 0.49984, 'fp32_mm': 0.56066, 'qframe': 0.10127, 'torch_int_mm': 0.13816}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': 512, 'kn_max': None, 'shapes': [
                    {'m': 512, 'k': 1152, 'n': 128, 'ms': {'float': 1.91098, 'fp32_mm': 9.68611, 'qframe': 0.47968, 'torch_int_mm': 0.48836}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 512, 'k': 2304, 'n': 256, 'ms': {'float': 21.40669, 'fp32_mm': 22.59967, 'qframe': 1.57231, 'torch_int_mm': 9.68215}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 512, 'k': 160, 'n': 960, 'ms': {'float': 1.97302, 'fp32_mm': 5.69194, 'qframe': 0.51104, 'torch_int_mm': 0.9443}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': None, 'kn_max': 65536, 'shapes': [
                    {'m': 2048, 'k': 576, 'n': 64, 'ms': {'float': 2.44517, 'fp32_mm': 9.59977, 'qframe': 0.51352, 'torch_int_mm': 0.59074}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 2048, 'k': 1280, 'n': 10, 'ms': {'float': 15.70154, 'fp32_mm': 7.04101, 'qframe': 0.44667, 'torch_int_mm': 0.55306}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
                {'m_max': None, 'kn_max': None, 'shapes': [
                    {'m': 2048, 'k': 1152, 'n': 128, 'ms': {'float': 24.7838, 'fp32_mm': 23.25416, 'qframe': 1.72613, 'torch_int_mm': 10.01673}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 2048, 'k': 2304, 'n': 256, 'ms': {'float': 82.22539, 'fp32_mm': 84.25942, 'qframe': 18.19498, 'torch_int_mm': 22.25947}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                    {'m': 2048, 'k': 160, 'n': 960, 'ms': {'float': 24.22287, 'fp32_mm': 23.1695, 'qframe': 2.0195, 'torch_int_mm': 11.58757}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': True}},
                ]},
            ],
        },
        'avx2': {
            'isa': 'avx2',
            'kernel': 'AVX2 u8 x s8 pairs',
            'env': {'QFRAME_CPU_ISA': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2'},
            'classes': [
                {'m_max': 1, 'kn_max': 65536, 'shapes': [
                    {'m': 1, 'k': 576, 'n': 64, 'ms': {'float': 0.01857, 'fp32_mm': 0.00513, 'qframe': 0.0059, 'torch_int_mm': 0.01095}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 1, 'k': 1280, 'n': 10, 'ms': {'float': 0.01487, 'fp32_mm': 0.00352, 'qframe': 0.00554, 'torch_int_mm': 0.00773}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 1, 'kn_max': None, 'shapes': [
                    {'m': 1, 'k': 1152, 'n': 128, 'ms': {'float': 0.03398, 'fp32_mm': 0.01291, 'qframe': 0.00981, 'torch_int_mm': 0.02407}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 1, 'k': 2304, 'n': 256, 'ms': {'float': 0.08856, 'fp32_mm': 0.04365, 'qframe': 0.02052, 'torch_int_mm': 0.07235}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 1, 'k': 160, 'n': 960, 'ms': {'float': 0.03937, 'fp32_mm': 0.02007, 'qframe': 0.01121, 'torch_int_mm': 0.02811}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 8, 'kn_max': 65536, 'shapes': [
                    {'m': 8, 'k': 576, 'n': 64, 'ms': {'float': 0.02579, 'fp32_mm': 0.01188, 'qframe': 0.0141, 'torch_int_mm': 0.01389}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 8, 'k': 1280, 'n': 10, 'ms': {'float': 0.02169, 'fp32_mm': 0.00944, 'qframe': 0.01393, 'torch_int_mm': 0.00959}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 8, 'kn_max': None, 'shapes': [
                    {'m': 8, 'k': 1152, 'n': 128, 'ms': {'float': 0.06426, 'fp32_mm': 0.04179, 'qframe': 0.03581, 'torch_int_mm': 0.03484}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 8, 'k': 2304, 'n': 256, 'ms': {'float': 0.20633, 'fp32_mm': 0.1595, 'qframe': 0.10775, 'torch_int_mm': 0.11302}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 8, 'k': 160, 'n': 960, 'ms': {'float': 0.06916, 'fp32_mm': 0.04506, 'qframe': 0.04423, 'torch_int_mm': 0.04541}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 64, 'kn_max': 65536, 'shapes': [
                    {'m': 64, 'k': 576, 'n': 64, 'ms': {'float': 0.07382, 'fp32_mm': 0.05501, 'qframe': 0.0928, 'torch_int_mm': 0.03927}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 64, 'k': 1280, 'n': 10, 'ms': {'float': 0.07916, 'fp32_mm': 0.05685, 'qframe': 0.09566, 'torch_int_mm': 0.0278}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 64, 'kn_max': None, 'shapes': [
                    {'m': 64, 'k': 1152, 'n': 128, 'ms': {'float': 0.23143, 'fp32_mm': 0.20341, 'qframe': 0.29566, 'torch_int_mm': 0.11823}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 64, 'k': 2304, 'n': 256, 'ms': {'float': 1.08627, 'fp32_mm': 0.96972, 'qframe': 1.10235, 'torch_int_mm': 0.47207}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 64, 'k': 160, 'n': 960, 'ms': {'float': 0.24531, 'fp32_mm': 0.21334, 'qframe': 0.2826, 'torch_int_mm': 0.18334}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 512, 'kn_max': 65536, 'shapes': [
                    {'m': 512, 'k': 576, 'n': 64, 'ms': {'float': 0.49998, 'fp32_mm': 0.41942, 'qframe': 0.52248, 'torch_int_mm': 0.23747}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 512, 'k': 1280, 'n': 10, 'ms': {'float': 0.754, 'fp32_mm': 0.6839, 'qframe': 0.7103, 'torch_int_mm': 0.26535}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': 512, 'kn_max': None, 'shapes': [
                    {'m': 512, 'k': 1152, 'n': 128, 'ms': {'float': 2.03338, 'fp32_mm': 1.81311, 'qframe': 1.71917, 'torch_int_mm': 0.93156}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 512, 'k': 2304, 'n': 256, 'ms': {'float': 23.29946, 'fp32_mm': 19.66386, 'qframe': 13.8291, 'torch_int_mm': 14.12991}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 512, 'k': 160, 'n': 960, 'ms': {'float': 7.72946, 'fp32_mm': 1.79569, 'qframe': 4.72067, 'torch_int_mm': 1.33628}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': None, 'kn_max': 65536, 'shapes': [
                    {'m': 2048, 'k': 576, 'n': 64, 'ms': {'float': 6.60163, 'fp32_mm': 2.607, 'qframe': 2.11365, 'torch_int_mm': 1.0591}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 2048, 'k': 1280, 'n': 10, 'ms': {'float': 5.89872, 'fp32_mm': 3.08081, 'qframe': 2.73462, 'torch_int_mm': 0.85604}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
                {'m_max': None, 'kn_max': None, 'shapes': [
                    {'m': 2048, 'k': 1152, 'n': 128, 'ms': {'float': 20.93524, 'fp32_mm': 25.67402, 'qframe': 18.83213, 'torch_int_mm': 11.44783}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 2048, 'k': 2304, 'n': 256, 'ms': {'float': 86.5119, 'fp32_mm': 82.04089, 'qframe': 68.61814, 'torch_int_mm': 39.81488}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                    {'m': 2048, 'k': 160, 'n': 960, 'ms': {'float': 24.11166, 'fp32_mm': 23.35328, 'qframe': 13.8124, 'torch_int_mm': 18.85833}, 'exact': {'float': True, 'fp32_mm': True, 'qframe': True, 'torch_int_mm': False}},
                ]},
            ],
        },
    },
}
