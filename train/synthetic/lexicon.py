"""Common English words for the train split's function-calling vocabulary.

Held-out functions are named in plain English ("verify_apartment", "duration_days"), and the
tokenizer cuts those names into pieces ("ver" "if" "y", "a" "par" "t" "ment"). A piece that no
training example ever asks the model to write is one its output layer never learned, and a call
that needs it is garbled. Made-up words alone cover the pieces of made-up words; these words
(nouns, then verbs) cover the pieces of real ones. ``function_pool`` drops every word of the
held-out vocabulary from them, so held-out names and values stay unseen as words.
"""

NOUNS = tuple("""
    account action activity address advice agreement airport amount analysis animal answer apple approval area army
    arrow article artist assembly assessment assignment attempt attention audience author avenue badge bakery
    balance band bank banner barrel base basket battery beach beard bedroom behavior bell belt benefit berry bicycle
    bill birthday blade blanket bloom board boat body bolt bone bonus booth boots border bottle boundary bowl branch
    brand bread breakfast brick bridge brother brush bubble bucket building bundle bus butter button cable cage cake
    camera campaign canal candidate candle canvas capacity capital card career cargo carpet carrot cart cash castle
    category cattle ceiling celebration chain chair chalk challenge champion channel chapter charge chart cheese
    chemistry cherry chest chicken chimney chip choice church cinema circle claim class clay client cliff climate
    clinic clock closet cloth cloud clown coach coast coffee coin collar collection college colour column
    combination comfort committee community company comparison competition complaint component concert condition
    conference connection construction consumer container content contract control conversation cookie copper copy
    corner cottage cotton council country county courage course court cousin cover craft crate cream credit crew
    crowd crown crystal culture cup curtain cushion customer cycle dairy damage dance danger database daughter deal
    debate decision deck definition delay delivery demand department deposit description desert design desk detail
    development device diagram diamond dinner direction director discount discussion disease display distance
    district dock document doll dollar dome donation draft dragon drawer dream dress driver drum dust eagle edge
    election element elevator emergency employee energy engine engineer entrance entry envelope environment
    equipment error essay estimate event evidence exam example exchange exercise exhibition experience expert fabric
    factory failure family farm feather feature feedback fence fern ferry festival fiber field figure file film
    finance finger fire fish fitness flag flame fleet floor flower flute focus fog folder food football forest fork
    formula fortune fountain fox frame freedom friend frost fruit function furniture future gadget gallery gallon
    game garage garden garlic gate gem giant gift glass glove glue goal government gown grade grain grant grape
    graph grass gravel ground group growth guarantee guest guide guitar habit hall hammer handle harbor harvest hat
    hay health heart hedge height helmet herb highway hill hinge history hive hobby holiday honey hook horn horse
    hospital host house hut ice image impact improvement income index industry information injury ink insurance
    interest interview invention investment iron island issue item ivory jacket jar jelly jewel journal journey
    judge juice kettle key kitchen kite knee knife knot knowledge label labour ladder lake lamp lane language
    lantern laptop lawn lawyer layer leader leaf lecture lemon lesson letter level lever library licence lid light
    limit line link lion list literature loan location lock loop lumber lunch machine magazine magnet mall
    management manager maple marble market marriage mask material matter meadow meal measure media medicine melon
    member memory metal method middle mill mint mirror mission mixture model moment monitor month moon morning
    mortgage moss motor mountain mouse movement movie mud mug museum music nail nation nature needle negotiation
    nest net network newspaper night noodle novel number nut oak oar object occasion office operation opinion orange
    organization outcome oven owl owner paddle pail painting palace palm pan panel paper parade parent park parrot
    partner party passenger password pasta path patient payment peach pearl pebble pen penalty pension pepper
    performance period permission person phone photo piano picture piece pier pillow pilot pin pipe pizza planet
    plant plate platform player plum pocket poem policy pollution pond pool population porch portrait position
    possession poster pot potato power practice preference presence president pressure printer prison problem
    procedure process product production program progress project promotion property proposal protection pump
    purchase puzzle quality quantity question quilt rabbit radio rail railway rain rating ray reaction reader
    reality reason recording region relation release rent repair replacement report request research resident
    resource response restaurant result review reward ribbon rice ring river road robe rock rocket role roof room
    rope rose route rug rule saddle safety sail salad salary salt sample sand satisfaction saucer scarf schedule
    school science scissors screen script season secret section sector security selection sentence sequence series
    service session settlement shape shell shelter shield shirt shop shovel signal signature silk silver singer sink
    sister situation sketch skill skirt sled slide smoke snack snow soap society sock sofa software soil solution
    song source space speaker speech speed spice spoon sport spring square stadium staff stage stamp statement
    station statue status steam stone stool storage store storm story stove strategy straw stream street strength
    string structure student studio subject success sugar summary supply surface survey sweater sword syrup system
    table tablet tail talent tank tape target task tea teacher team technology temperature tennis tension tent term
    territory test theatre theory thought thread throne tile timber tin toast toe tomato tongue tool tooth topic
    torch tourist tournament towel tower toy track trade tradition traffic transport tray treatment tree trial truck
    trust tulip tunnel umbrella university upload user vacation valley value vase vehicle velvet venue version vest
    video village violin visit volume wagon wall wallet warning washer water wax way wealth website wedding weekend
    wheel whistle wind window wing winner winter wire wolf wood wool worker workshop writer yard yarn youth zone
""".split())

VERBS = tuple("""
    accept achieve acquire activate adapt adjust admit advance advise afford align allow alter analyse announce
    apply appoint approve arrange assess assign assist assume attach attend attract avoid bake bind blend block
    boost borrow bounce brew brief broadcast build buy calculate cancel capture carry cast celebrate change charge
    chase check choose cite claim clean clear climb clip close coach collapse collect combine commit compare compile
    complete compose compress conduct configure confirm connect consult contain convert correct craft crawl create
    cross crush cut debug declare decode decorate define delay delete deliver demand deny depart deploy describe
    design destroy detect develop dial dig direct disable discover dismiss display divide donate download drag drain
    draw drop dump earn echo edit elect embed employ enable encode encrypt end endorse engage ensure enter evaluate
    evolve examine execute expand expect explain explore export extend fade fasten feed fill filter finish fire fix
    flag flip float flush fold follow format forward frame freeze fund gather generate grab grade greet grind grow
    guard guess harvest heat help hide highlight hire hold host hunt identify ignore import improve include inform
    insert inspect install interpret invest invite iterate join keep label land launch lend lift link list load
    locate lock log manage map mark match mention merge migrate mix mount move name navigate note notify obtain
    offer open operate optimize order organize outline own pack paint parse pass patch pause pay perform permit
    persist pick pin place plant play pledge plot polish poll post pour predict prefer prepare present press prevent
    price print probe promote prompt propose protect provide publish pull push qualify query raise rank rate reach
    read recall receive recommend record recover recruit redeem reduce refer refresh refund reject relax relay rely
    remind remove rename render renew rent reorder repeat replace reply rescue reset resolve respond restart restore
    resume retain retire retrieve return reveal revise reward ring rinse rotate route run sample save scan score
    seal search seed select sell send serve set settle shape shift ship show shuffle sign signal simulate skip slice
    snap solve sort spend spin split sponsor spray stack stage stamp start state steer step stop stream stretch
    study style submit subscribe suggest summarize supply support survey suspend swap sweep switch sync tag take
    target teach tell throw toggle track trade transfer translate trigger trim trust tune turn type undo unite
    unlock unpack update upgrade use validate view visit vote wait walk warn wash watch weigh welcome wrap write
    yield zoom
""".split())
